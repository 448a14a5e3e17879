# anytext2-lcm: the two commands a new user runs are `make test` and `make demo`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo setup fonts browser clean

# Everything `make test` needs, from a machine that only has Python.
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# Keep a torch that is already there (e.g. a CUDA build a GPU user installed first); else the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@# PP-OCR models inside a wheel, for OCR evaluation; --no-deps because it declares opencv-python.
	$(PIP) install -q --no-deps rapidocr-onnxruntime==1.4.4
	@$(MAKE) --no-print-directory fonts
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# A CJK-capable font for glyph rendering (Noto Sans CJK or WenQuanYi), installed from the OS where missing.
fonts:
	@if fc-list 2>/dev/null | grep -qiE 'Noto Sans CJK|WenQuanYi|wqy'; then echo "CJK font: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk fonts-wqy-microhei >/dev/null) \
	  && echo "CJK font: installed" || echo "CJK font: install failed; pass --font FILE or install fonts-noto-cjk"; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk fonts-wqy-microhei >/dev/null) \
	  && echo "CJK font: installed" || echo "CJK font: install failed; pass --font FILE or install fonts-noto-cjk"; \
	else echo "CJK font: not found; install Noto Sans CJK or WenQuanYi, or pass --font FILE"; fi

# Headless Chromium + its matching chromedriver (the OS packages) for the UI's browser test; nothing downloads a browser.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  && echo "chromium: installed" || echo "chromium: install failed; the browser test will skip (apt-get install chromium chromium-driver)"; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  && echo "chromium: installed" || echo "chromium: install failed; the browser test will skip (apt-get install chromium chromium-driver)"; \
	else echo "chromium: not found; the browser test will skip (install the OS packages chromium and chromium-driver)"; fi

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/anytext2-lcm demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
