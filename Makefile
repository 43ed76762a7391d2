# The README's two commands. Each sets up the environment by itself the first time and reuses it after:
#
#   make quickstart   the main job on the embedded default (offline, CPU); ARGS="..." adds its options
#   make test         the test suite (what CI runs); ARGS="..." adds pytest options, e.g. ARGS="-m core"
#
# The environment is a virtual environment in $(VENV) with this package installed editable plus the dev
# extras. It is (re)installed only when the stamp for the current pyproject.toml is missing: the stamp's name
# carries a checksum of pyproject.toml's content (not its timestamp, which a fresh clone or a checkout resets),
# so a changed dependency list reinstalls once and an unchanged one never does.
#
# Python 3.11, 3.12 and 3.13 (PYTHON=python3.12 ...). Each version gets its own environment: .venv for 3.11,
# .venv-3.12 / .venv-3.13 for the others, so switching versions neither reuses nor wipes another's. The stamp
# also carries the version, and an environment built by another Python is rebuilt (--clear), never reused:
# that covers an explicit VENV=... shared between versions.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= $(if $(filter-out 3.11,$(PYVER)),.venv-$(PYVER),.venv)
ARGS ?=
STAMP := $(VENV)/.revq-ray-installed-py$(PYVER)-$(firstword $(shell cksum pyproject.toml))

.PHONY: quickstart test venv

quickstart: $(STAMP)
	$(VENV)/bin/revq-ray quickstart $(ARGS)

# pytest exit 5 = "no tests collected": a suite that ran nothing must not pass silently.
test: $(STAMP)
	@$(VENV)/bin/pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

venv: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(None if (3, 11) <= sys.version_info[:2] <= (3, 13) else \
	  "revq-ray needs Python 3.11, 3.12 or 3.13, and $(PYTHON) is " + sys.version.split()[0] + \
	  ": run make PYTHON=/path/to/python3.12 ...")'
	@echo "setting up $(VENV) with Python $(PYVER) (once; about 5 minutes and 5 GB: torch, Ray, DeepSpeed, ...)"
	@if [ -x $(VENV)/bin/python ] && [ "$$($(VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$(PYVER)" ]; then \
	  echo "$(VENV) was built by another Python: rebuilding it for $(PYVER)"; $(PYTHON) -m venv --clear $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[dev]"
	@rm -f $(VENV)/.revq-ray-installed-*
	@touch $@

# `make print-STAMP` prints a variable (the tests read the stamp's name this way).
print-%:
	@echo $($*)
