# tailsfw: two commands for a new user, `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# What `make deb` needs: dpkg-buildpackage, lintian and debian/control's
# Build-Depends (with Debian's own runtime packages: the package's tests run
# on them; dpkg-buildpackage names any that this list misses).
DEB_BUILD_DEBS := dpkg-dev fakeroot lintian debhelper dh-python pybuild-plugin-pyproject \
        python3-all python3-setuptools groff-base man-db python3-dbus-fast python3-hypothesis \
        python3-nftables python3-pytest python3-systemd python3-tomli-w
DEBS := $(sort nftables python3-nftables python3-venv python3-dev libsystemd-dev pkg-config gcc \
        iproute2 util-linux passwd procps dbus-daemon dbus-bin python3-dbusmock dnsmasq-base \
        systemd systemd-container man-db groff-base curl dbus $(DEB_BUILD_DEBS))
# Services the lab runs by hand, in its namespaces.  Installed only where no
# systemd runs (a container, CI): on a machine run by systemd, installing
# them would enable them there.  Without them, their tests skip, saying so.
LAB_SERVICE_DEBS := network-manager tor
STAMP := $(VENV)/.installed
# Packages are installed with a policy-rc.d that forbids starting services
# (tor and dnsmasq would otherwise start in this machine's own namespace);
# the lab starts its own, in its namespaces.

# Where `make deb` puts the package (the build itself runs in a temporary
# directory outside the source, removed afterwards).
DEBDIR ?= dist
# Debian's own tools and Python only (another python3 may come first on PATH).
DEBIAN_PATH := /usr/sbin:/usr/bin:/sbin:/bin
# `make install`: the files of the Debian package, for other distributions.
PREFIX ?= /usr/local
DESTDIR ?=
UNITDIR ?= $(PREFIX)/lib/systemd/system
PYTHON ?= /usr/bin/python3
MAN8 := man/tailsfwd.8 man/tailsfwctl.8
MAN5 := man/tailsfw-policy.5
DOCS := README.md $(wildcard docs/*.md)

.PHONY: venv test lint unit lab demo bench prove clean deb deb-deps install install-files

# Installs the missing Debian packages of $(1), with services kept from starting.
define apt_install
	@wanted="$(1)"; \
	missing=$$(for p in $$wanted; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; guard=1; \
	  fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  rc=$$?; [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc -eq 0 ]; \
	fi
endef

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(call apt_install,$(DEBS) $(if $(wildcard /run/systemd/system),,$(LAB_SERVICE_DEBS)))
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

deb-deps:
	$(call apt_install,$(DEB_BUILD_DEBS))

# A copy of the source is built in a temporary directory (dpkg-buildpackage
# writes next to the source and leaves debian/ build files): nothing is
# written in this checkout but $(DEBDIR).
deb: deb-deps
	@set -e; build=$$(mktemp -d /tmp/tailsfw-deb.XXXXXX); trap 'rm -rf "$$build"' EXIT; \
	mkdir "$$build/tailsfw"; \
	tar -c --exclude=.git --exclude=.venv --exclude='./$(DEBDIR)' --exclude=__pycache__ \
	    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache . \
	  | tar -x -C "$$build/tailsfw"; \
	(cd "$$build/tailsfw" && env PATH=$(DEBIAN_PATH) dpkg-buildpackage -us -uc -b); \
	lintian --fail-on error,warning "$$build"/*.deb; \
	mkdir -p $(DEBDIR); cp "$$build"/*.deb $(DEBDIR)/; ls -l $(DEBDIR)/*.deb

# Every file of the package but the Python package and its two commands;
# debian/rules calls it too.
install-files:
	install -D -m 0755 libexec/fail-closed $(DESTDIR)$(PREFIX)/libexec/tailsfw/fail-closed
	install -d $(DESTDIR)$(UNITDIR)
	sed -e 's,/usr/libexec/tailsfw/,$(PREFIX)/libexec/tailsfw/,' \
	    -e 's,/usr/bin/tailsfwd ,$(PREFIX)/bin/tailsfwd ,' systemd/tailsfwd.service \
	    > $(DESTDIR)$(UNITDIR)/tailsfwd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/tailsfwd.service
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/dbus-1/system.d \
	    etc/dbus-1/system.d/org.boum.tails.Firewall.conf
	install -D -m 0644 -t $(DESTDIR)/etc/tailsfw etc/tailsfw/policy.toml
	install -D -m 0644 -t $(DESTDIR)/etc/NetworkManager/conf.d etc/NetworkManager/conf.d/tailsfw.conf
	install -D -m 0644 -t $(DESTDIR)/etc/sysctl.d etc/sysctl.d/50-tailsfw.conf
	install -D -m 0644 -t $(DESTDIR)/etc/modprobe.d etc/modprobe.d/tailsfw.conf
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/man/man8 $(MAN8)
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/man/man5 $(MAN5)
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/tailsfw $(DOCS)

# The package's files, and the Python package with bin/tailsfwd and
# bin/tailsfwctl under PREFIX, for $(PYTHON) (dependencies: debian/control's
# Depends, or pyproject.toml's).  DEB_PYTHON_INSTALL_LAYOUT: Debian's own
# Python would otherwise add local/ to PREFIX; other Pythons ignore it.
install: install-files
	DEB_PYTHON_INSTALL_LAYOUT=deb_system $(PYTHON) -m pip install --quiet --no-deps \
	    --no-build-isolation --no-compile --root-user-action=ignore \
	    --root=$(or $(DESTDIR),/) --prefix=$(PREFIX) .
	rm -rf build

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(DEBDIR)
