# tailsfw: two commands for a new user, `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEBS := nftables python3-nftables python3-venv python3-dev libsystemd-dev pkg-config gcc \
        iproute2 util-linux passwd procps dbus-daemon dbus-bin python3-dbusmock dnsmasq-base \
        systemd systemd-container man-db groff-base curl
# Services the lab runs by hand, in its namespaces.  Installed only where no
# systemd runs (a container, CI): on a machine run by systemd, installing
# them would enable them there.  Without them, their tests skip, saying so.
LAB_SERVICE_DEBS := network-manager tor
STAMP := $(VENV)/.installed
# Packages are installed with a policy-rc.d that forbids starting services
# (tor and dnsmasq would otherwise start in this machine's own namespace);
# the lab starts its own, in its namespaces.

.PHONY: venv test lint unit lab demo bench prove clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@wanted="$(DEBS)"; [ -d /run/systemd/system ] || wanted="$$wanted $(LAB_SERVICE_DEBS)"; \
	missing=$$(for p in $$wanted; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; guard=1; \
	  fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  rc=$$?; [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc -eq 0 ]; \
	fi
	[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check tailsfw tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m tests.lab.demo

bench: venv
	$(PY) -m bench.run

# Every class of packet of the shipped policy, in the kernel, against the
# specification (docs/proof.md); root, in a scratch network namespace.
prove: venv
	$(PY) -m tailsfw.cli prove --policy etc/tailsfw/policy.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
