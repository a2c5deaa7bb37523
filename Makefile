# The two commands of the README:
#   make demo   set up everything on a fresh machine and run the main job (images from the embedded model)
#   make test   set up everything on a fresh machine and run the whole test suite (CI runs this)
# Other targets: install, default-model, bench, cmake-check, sanitize-check, cuda-check, wheel-check, clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
CUDA_TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
CUDA_VENV ?= .venv-cuda
WHEEL_VENV ?= .venv-wheel
# A compiler cache, when installed, makes rebuilds cheap: torch's extension builder and setup.py's
# per-ISA kernels use ccache by themselves; CMake is told here.
CCACHE := $(shell command -v ccache 2>/dev/null)
ifneq ($(CCACHE),)
CMAKE_LAUNCHER := -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
endif

.PHONY: demo default-model test install bench cmake-check sanitize-check cuda-check wheel-check clean

$(VENV)/.torch-$(TORCH_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
	touch $@

install: $(VENV)/.torch-$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'

# The main job: images from the embedded default model (no download), into out/.
demo: install
	$(PY) -m cogview.info
	$(PY) -m cogview.cli generate "a red circle" "a blue triangle" "a large green square in the center" \
	  "一个黄色圆形" -n 8 --out out/demo --no-progress
	cp out/demo/grid.png out/grid.png && echo "make demo: wrote out/grid.png (and out/demo/)"

# Train the embedded default model from scratch (recipes/default/) and measure its quality.
default-model: install
	$(PY) recipes/default/build.py

test: install
	@set +e; HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: that is a failure here"; exit 1; fi; \
	exit $$rc

bench: install
	for script in bench/[a-z]*.py; do $(PY) $$script || exit 1; done

# The same _C through CMake (C++ tooling, sanitizer builds), so CMakeLists.txt cannot rot.
cmake-check: install
	cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_LAUNCHER) > /dev/null
	cmake --build build/cmake
	rm -rf build/cmake-stage && mkdir -p build/cmake-stage && cp -r cogview build/cmake-stage/
	rm -f build/cmake-stage/cogview/_C*.so && cp build/cmake/_C*.so build/cmake-stage/cogview/
	cd build/cmake-stage && $(abspath $(PY)) -c "import cogview, torch; \
	  assert cogview._native.BUILD_INFO['build_tool'] == 'cmake'; x = torch.randn(4, 33); \
	  w, b = torch.ones(33), torch.zeros(33); \
	  torch.testing.assert_close(cogview.ops.layer_norm(x, w, b), cogview.ops.reference.layer_norm(x, w, b)); \
	  print('cmake build of cogview._C: OK')"

# The op tests and the fuzz test against an AddressSanitizer + UndefinedBehaviorSanitizer build of _C
# (CMake, COGVIEW_SANITIZE=ON), staged like cmake-check. The python interpreter is not instrumented, so
# the compiler's sanitizer runtimes are preloaded. Leak detection is off: CPython and libtorch keep
# allocations alive until exit by design, and they are not ours. No suppressions: any report in csrc/
# aborts the test process, which fails the target.
SANITIZE_TESTS ?= tests/test_layer_norm.py tests/test_local_attention.py tests/test_decoding.py \
  tests/test_sampling.py tests/test_fuzz_ops.py
SANITIZE_CC ?= $(or $(shell command -v gcc 2>/dev/null),cc)
sanitize-check: install
	cmake -S . -B build/cmake-asan -G Ninja -DCOGVIEW_SANITIZE=ON -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  $(CMAKE_LAUNCHER) > /dev/null
	cmake --build build/cmake-asan
	rm -rf build/asan-stage && mkdir -p build/asan-stage && cp -r cogview tests build/asan-stage/
	rm -f build/asan-stage/cogview/_C*.so && cp build/cmake-asan/_C*.so build/asan-stage/cogview/
	cd build/asan-stage && \
	  export LD_PRELOAD="$$($(SANITIZE_CC) -print-file-name=libasan.so) $$($(SANITIZE_CC) -print-file-name=libubsan.so)" \
	    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
	    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 HYPOTHESIS_PROFILE=ci && \
	  $(abspath $(PY)) -c "import cogview; assert cogview._native.BUILD_INFO['build_tool'] == 'cmake'; \
	    assert cogview.__file__.startswith('$(abspath build/asan-stage)'), cogview.__file__; \
	    print('sanitizer build of cogview._C: loaded')" && \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

# Compile and link every CUDA kernel without a GPU (CUDA build of torch + nvcc), then check that each
# op with a CUDA kernel in csrc/cuda is registered for CUDA.
CUDA_HOME ?= $(shell for d in "$$CUDA_HOME" /usr/local/cuda; do [ -x "$$d/bin/nvcc" ] && { echo $$d; break; }; done)
cuda-check:
	@if [ -z "$(CUDA_HOME)" ]; then echo "cuda-check: no CUDA toolkit (nvcc) found; set CUDA_HOME"; exit 1; fi
	[ -f $(CUDA_VENV)/.torch-$(CUDA_TORCH_VERSION) ] || { $(PYTHON) -m venv $(CUDA_VENV) && \
	  $(CUDA_VENV)/bin/pip install -q --disable-pip-version-check "torch==$(CUDA_TORCH_VERSION)" \
	    "setuptools>=64" wheel ninja numpy && touch $(CUDA_VENV)/.torch-$(CUDA_TORCH_VERSION); }
	CUDA_HOME=$(CUDA_HOME) COGVIEW_FORCE_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} $(CUDA_VENV)/bin/python setup.py -q \
	  build_ext --build-temp build/cuda-temp --build-lib build/cuda-lib
	rm -rf build/cuda-stage && mkdir -p build/cuda-stage && cp -r cogview build/cuda-stage/
	rm -f build/cuda-stage/cogview/_C*.so && cp build/cuda-lib/cogview/_C*.so build/cuda-stage/cogview/
	cd build/cuda-stage && PYTHONPATH=$(abspath build/cuda-stage) $(abspath $(CUDA_VENV))/bin/python \
	  $(abspath build_tools/cuda_check.py)

# Build a wheel, install it (not editable) in a fresh environment, and use it from outside the tree.
wheel-check: install
	rm -rf dist && $(PY) -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w dist .
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(WHEEL_VENV)/bin/pip install -q --disable-pip-version-check dist/cogview-*.whl
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/python $(abspath build_tools/wheel_smoke.py)

clean:
	rm -rf build dist *.egg-info cogview/_C*.so
