# fastlb: `make run` (demo), `make test` (Rust + Python tests), `make install`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install install-dev run test lint bench dist release-check clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

## install: build the Rust extension in release mode and install fastlb into .venv
install: $(VENV)/bin/activate
	$(PIP) install -q .
	@echo "installed: $(VENV)/bin/fastlb"

install-dev: $(VENV)/bin/activate
	$(PIP) install -q ".[dev]"

## run: install, then start the demo (three backends, a listener on 127.0.0.1:8080)
run: install
	$(VENV)/bin/fastlb demo

## test: install with dev extras, then the Rust unit tests and the pytest suite
test: install-dev
	cargo test --release --lib
	$(PY) -m pytest -q
	# the micro benchmarks, once each as a smoke test (`make bench` runs them fully)
	$(PY) -m pytest -q bench/micro --benchmark-disable -p no:cacheprovider

## lint: formatters and linters, as CI would want them
lint: install-dev
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench tools
	$(VENV)/bin/ruff format --check python tests bench tools
	$(VENV)/bin/mypy

## bench: micro benchmarks and the side-by-side comparison; writes bench/RESULTS.md
bench: install-dev
	@command -v haproxy >/dev/null && command -v wrk >/dev/null && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] && \
	  command -v dnsperf >/dev/null && command -v dnsdist >/dev/null && command -v h2load >/dev/null || \
	  { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; $$SUDO apt-get install -y -q haproxy nginx libnginx-mod-stream wrk curl gcc dnsperf dnsdist nghttp2-client; }
	$(VENV)/bin/pip install -q -e ".[dev,bench]"
	$(PY) bench/run.py

## dist: manylinux_2_17 wheels for x86_64 and aarch64 (maturin with zig, from PyPI's ziglang) and an
## sdist, in dist/
ZIG_BUILD = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build --release --zig --compatibility manylinux_2_17
dist: $(VENV)/bin/activate
	$(PIP) install -q "maturin>=1.5,<2" ziglang auditwheel
	rustup target add aarch64-unknown-linux-gnu
	rm -rf dist
	# zig is found as `python -m ziglang` of the first python on PATH: the venv's
	$(ZIG_BUILD) --out dist
	$(ZIG_BUILD) --target aarch64-unknown-linux-gnu --out dist
	$(VENV)/bin/maturin sdist --out dist
	for w in dist/*.whl; do $(VENV)/bin/auditwheel show $$w; done

## release-check: dist, then the wheel on Python 3.11/3.12/3.13 and the sdist, each smoke-tested
release-check: dist
	$(PY) tools/release_check.py

clean:
	rm -rf $(VENV) target build dist
