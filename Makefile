# progdump: the user's verbs. See README.md.
PYTHON ?= python3
NAME ?= sysrq-panic
GUEST ?= linux
OMNIOS_RELEASE ?= r151058
# An explicit GUEST= (command line or environment) overrides the scenario's own guest.
GUEST_ENV := $(if $(filter command line environment,$(origin GUEST)),GUEST=$(GUEST))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := qemu-system-x86 qemu-utils qemu-block-extra makedumpfile busybox-static \
	dropbear-bin cpio zstd tgt e2fsprogs gcc-12 make gdb crash python3-pip mtools
STAMP := .cache/setup.stamp

.PHONY: setup lint test test-unit test-vm guest-image dbg-vmlinux scenario scenarios regress fidelity bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "== setup: Debian packages ($(DEB_PACKAGES))"
	@if ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi
	@# Debian's tgt package enables and starts a system tgtd listening on every address; the
	@# iscsi scenarios run a private one on loopback, so leave none enabled or running
	@# (systemd where it runs, else the init script; neither failing stops the setup).
	@if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then \
		$(SUDO) systemctl disable --now tgt >/dev/null 2>&1 || true; \
	elif [ -x /etc/init.d/tgt ]; then \
		$(SUDO) /etc/init.d/tgt stop >/dev/null 2>&1 || true; \
		command -v update-rc.d >/dev/null 2>&1 && $(SUDO) update-rc.d tgt disable >/dev/null 2>&1 || true; \
	fi
	@echo "== setup: Python packages"
	@# Debian 12's own python3 is "externally managed" (PEP 668): pip refuses to install into it
	@# unless told; a pyenv or venv python ignores the variable.
	PIP_BREAK_SYSTEM_PACKAGES=1 $(PYTHON) -m pip install -q -e '.[harness,test]'
	@mkdir -p .cache && touch $(STAMP)

# GUEST=linux builds the stand-in; GUEST=omnios fetches an official cloud image (OMNIOS_RELEASE),
# SHA-256 checked, unless OMNIOS_IMAGE names one already.
guest-image: setup
ifeq ($(GUEST),omnios)
	$(PYTHON) guest-images/omnios/fetch.py --release $(OMNIOS_RELEASE)
else
	$(PYTHON) guest-images/linux/build.py
endif

# test-only: the guest kernel's -dbg vmlinux, for drgn's own unwinder as a cross-check (optional)
dbg-vmlinux: guest-image
	$(PYTHON) guest-images/linux/fetch_dbg.py

# ruff's lint and formatter check, mypy on progdump/ (configured in pyproject.toml);
# `ruff format .` applies the format
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test: setup lint guest-image dbg-vmlinux
	$(PYTHON) -m pytest -ra tests/unit tests/vm

test-unit: setup
	$(PYTHON) -m pytest -ra tests/unit

test-vm: setup guest-image dbg-vmlinux
	$(PYTHON) -m pytest -ra tests/vm

# the omnios image is never built here: without OMNIOS_IMAGE the harness refuses in one line
scenario: setup $(if $(filter omnios,$(GUEST)),,guest-image)
	$(GUEST_ENV) $(PYTHON) -m harness.scenario run $(NAME)

scenarios: setup
	@$(PYTHON) -m harness.scenario list

regress: setup guest-image
	$(PYTHON) -m harness.scenario regress

fidelity: setup guest-image
	$(PYTHON) -m harness.scenario fidelity

bench: setup guest-image
	$(PYTHON) bench/run.py

# the peers side by side on a 512 MiB guest (bench/peers.py --quick), then the armed writer's layer 0
bench-quick: setup guest-image
	$(PYTHON) bench/peers.py --quick
	$(PYTHON) bench/resident_layer0.py --elf .cache/bench/peers-512m.elf

clean:
	rm -rf .cache results build *.egg-info
