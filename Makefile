# tailsfw: two commands for a new user, `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEBS := nftables python3-nftables python3-venv python3-dev libsystemd-dev pkg-config gcc \
        iproute2 util-linux passwd procps dbus-daemon dbus-bin python3-dbusmock dnsmasq-base \
        systemd systemd-container man-db groff-base
# Services the lab runs by hand, in its namespaces.  Installed only where no
# systemd runs (a container, CI): on a machine run by systemd, installing
# them would start them there.  Without them, their tests skip, saying so.
LAB_SERVICE_DEBS := network-manager
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit lab demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@wanted="$(DEBS)"; [ -d /run/systemd/system ] || wanted="$$wanted $(LAB_SERVICE_DEBS)"; \
	missing=$$(for p in $$wanted; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
