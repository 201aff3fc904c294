# The two commands a newcomer needs: `make demo` and `make test`. Both install first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-long bench clean

install: $(STAMP)

# torch first, from the pinned CPU wheel; then the package with every other pin from constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/fednnunet demo --workdir demo_run

test: install
	$(BIN)/python -m pytest -q --durations=15 -m "not long" tests

# The rest of nnU-Net end to end (find_best_configuration against nnU-Net on pooled outputs, ResEnc presets,
# cascade): too slow for `make test`.
test-long: install
	$(BIN)/python -m pytest -q --durations=0 tests_long
	$(BIN)/python -m pytest -q --durations=0 -m long tests

# Benchmarks (not part of the tests): they print numbers and write JSON into benchmarks_out/.
# With the real retina sites beside the clone (../shared), planning (DRIVE alone, all four) and the data checks are
# also timed on them.
RETINA := ../shared/data/retina-vessels
bench: install
	$(BIN)/fednnunet bench all --out benchmarks_out
	if [ -d $(RETINA) ]; then \
	  rm -rf benchmarks_out/retina_raw && \
	  $(BIN)/fednnunet convert retina-vessels $(RETINA) --out benchmarks_out/retina_raw --first-id 950 && \
	  $(BIN)/fednnunet bench planning --raw benchmarks_out/retina_raw --datasets 950 --out benchmarks_out && \
	  $(BIN)/fednnunet bench planning --raw benchmarks_out/retina_raw --datasets "950 951 952 953" --out benchmarks_out && \
	  $(BIN)/fednnunet bench checks --no-demo --raw benchmarks_out/retina_raw --datasets "950 951 952 953" --out benchmarks_out; \
	fi

clean:
	rm -rf $(VENV) demo_run benchmarks_out
