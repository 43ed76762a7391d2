# The README's two commands. Each sets up the environment by itself the first time and reuses it after:
#
#   make quickstart   the main job on the embedded default (offline, CPU); ARGS="..." adds its options
#   make test         the test suite (what CI runs); ARGS="..." adds pytest options, e.g. ARGS="-m core"
#
# The environment is a virtual environment in $(VENV) with this package installed editable plus the dev
# extras. It is (re)installed only when the stamp for the current pyproject.toml is missing: the stamp's name
# carries a checksum of pyproject.toml's content (not its timestamp, which a fresh clone or a checkout resets),
# so a changed dependency list reinstalls once and an unchanged one never does.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
ARGS ?=
STAMP := $(VENV)/.revq-ray-installed-$(firstword $(shell cksum pyproject.toml))

.PHONY: quickstart test venv

quickstart: $(STAMP)
	$(VENV)/bin/revq-ray quickstart $(ARGS)

# pytest exit 5 = "no tests collected": a suite that ran nothing must not pass silently.
test: $(STAMP)
	@$(VENV)/bin/pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

venv: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info[:2] == (3, 11) else \
	  "revq-ray needs Python 3.11, and $(PYTHON) is " + sys.version.split()[0] + \
	  ": run make PYTHON=/path/to/python3.11 ...")'
	@echo "setting up $(VENV) (once; about 5 minutes and 5 GB: torch, Ray, DeepSpeed, ...)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[dev]"
	@rm -f $(VENV)/.revq-ray-installed-*
	@touch $@

# `make print-STAMP` prints a variable (the tests read the stamp's name this way).
print-%:
	@echo $($*)
