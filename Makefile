# tailsfw: two commands for a new user, `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEBS := nftables python3-nftables python3-venv python3-dev libsystemd-dev pkg-config gcc \
        iproute2 util-linux passwd procps tor dnsmasq curl
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit lab demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
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
