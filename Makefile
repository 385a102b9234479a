# Developer shortcuts.  Everything here is also reachable by plain commands;
# see README.md.
PY ?= python3

.PHONY: build test stress-test debug asan bench lint native-test wine-test wheels-check clean

build:            ## build the extension in place (build_clib tracks no
	$(PY) setup.py build_clib --force build_ext --inplace  # header deps)

test: build       ## the test suite against every backend available here
	$(PY) -m pytest -q tests

stress-test: build  ## the suite 3 times back to back under a CPU hog on every core
	PY=$(PY) bash tests/stress.sh

debug:            ## -O0 -g build with Cython line tracing
	IOCP_DEBUG=1 $(PY) setup.py build_clib --force build_ext --inplace --force

asan:             ## AddressSanitizer + UBSan build, then the suite
	bash tests/asan.sh

bench: build      ## quick benchmark table
	$(PY) -m iocp bench --quick

lint:
	ruff check iocp tests benchmarks examples
	$(PY) -m mypy iocp/_core.pyi

native-test:      ## C driver against the Linux backends
	bash tests/native/run.sh

wine-test:        ## Windows backend cross-compiled, run under Wine
	bash tests/wine/run.sh

wheels-check:     ## build a wheel, test it on every pyenv Python 3.9-3.13
	bash tests/wheels/check.sh

clean:
	rm -rf build dist *.egg-info src/iocp_core.c iocp/*.so
