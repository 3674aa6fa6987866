# The course's two commands:
#   make lab   set up .venv (once) and start JupyterLab on notebooks/
#   make test  set up .venv (once), then the unit tests and every notebook in quick mode
#
# Set-up installs torch first (TORCH, default torch==2.13.0: the CPU build where
# pip's find-links provides it, else PyPI's default build for your platform),
# then the course with its notebook and test extras. Override with e.g.
#   make lab PYTHON=python3.12 TORCH='torch --index-url https://download.pytorch.org/whl/cpu'

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.course-installed

.PHONY: lab test test-fast test-min test-browser venv clean-venv data gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "the course needs Python >= 3.10, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[notebooks,test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name sd-from-scratch --display-name 'Python (sd-from-scratch)'
	touch $(STAMP)

# Extra JupyterLab options, e.g. make lab LAB_ARGS='--port=9999 --no-browser'.
# As root (a container), JupyterLab refuses to start without --allow-root, so it is added there.
LAB_ARGS ?=
ROOT_ARG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ROOT_ARG) $(LAB_ARGS)

# The suite on every core: a worker per core and one more (pytest-xdist), each test file and notebook whole on one worker,
# one torch thread per worker and per notebook kernel (conftest.py); the 15 slowest tests are listed at the end.
# `make test-fast` runs the unit tests alone, for a quick check.
# One worker more than the cores: the browser tests' workers wait on JupyterLab and Chromium, and the extra worker
# fills those waits (on the 2-core CI machine: 3 workers).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)' 2>/dev/null || echo auto)
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests --deselect tests/test_browser_a.py --deselect tests/test_browser_b.py

# The same suite in a second environment holding the lowest versions pyproject.toml allows (matplotlib 3.8 is known
# to break inline figures), then the widget code and the notebooks with widgets again with Colab's ipywidgets 7.7.1
# in the kernel (Colab renders 7.7 with its own front end; JupyterLab 4 renders only 8, so no browser test there).
MIN_VERSIONS := numpy==1.26.4 matplotlib==3.9.4 ipywidgets==8.1.0 ipykernel==6.29.5 pillow==10.0.1 \
                tqdm==4.66.1 einops==0.7.0 regex==2024.11.6 safetensors==0.8.0 pytest==8.0.0 nbval==0.11.0 \
                pytest-xdist==3.5.0
test-min:
	test -x .venv-min/bin/python || $(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install --quiet $(TORCH) $(MIN_VERSIONS) diffusers==0.42.1 peft==0.21.2 playwright==1.65.2
	.venv-min/bin/python -m pip install --quiet --no-deps -e .
	.venv-min/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile
	.venv-min/bin/python -m pip install --quiet ipywidgets==7.7.1
	.venv-min/bin/python -m pytest tests/test_widgets.py $(WIDGET_NOTEBOOKS); status=$$?; \
	  .venv-min/bin/python -m pip install --quiet ipywidgets==8.1.0; exit $$status
WIDGET_NOTEBOOKS := $(addprefix notebooks/,01_noise_addition.ipynb 02_forward_markov_chain.ipynb 05_sampling.ipynb \
                      06_vae_latent_space.ipynb 08_text_encoder.ipynb 09_text_to_image.ipynb 10_lora.ipynb \
                      13_rectified_flow.ipynb 14_diffusion_transformer.ipynb 15_editing.ipynb 17_control.ipynb \
                      19_memory_budget.ipynb)

# The widgets in a real browser alone (tests/test_browser_a.py and _b.py; `make test` runs them too where Chromium is
# installed):
# JupyterLab in quick mode, driven by Playwright in Debian's Chromium (apt-get install chromium; Playwright's own
# browser download is not used). Screenshots in runs/browser/.
test-browser: $(STAMP)
	@command -v chromium >/dev/null || test -n "$$CHROMIUM" || { echo "needs Chromium: apt-get install chromium (or set CHROMIUM)"; exit 1; }
	$(BIN)/python -m pytest tests/test_browser_a.py tests/test_browser_b.py -v

# Rebuild data/ from the pinned npm packages and the pinned scikit-image wheel (needs npm and network).
data: $(STAMP)
	$(BIN)/python scripts/build_emoji_data.py
	$(BIN)/python scripts/build_photos.py

# The wheels the GPU machine's call carries (docs/stable_diffusion_15.md, "The GPU run, prepared"): it has Python 3.12
# and no Jupyter, so scripts/run_notebooks_plain.py runs the notebooks in IPython with ipywidgets, from these (2.3 MB).
GPU_WHEELS := ipywidgets==8.1.9 ipython==9.19.1 ipython_pygments_lexers==1.1.1 traitlets==5.16.1 comm==0.2.3 \
              decorator==5.3.2 matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 \
              wcwidth==0.9.5 stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0 pure_eval==0.2.4
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean-venv:
	rm -rf $(VENV)
