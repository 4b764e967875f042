# Convenience wrappers; dev.py needs nothing but Python 3.11+.
.PHONY: demo test bench lint
demo:
	python3 dev.py demo
test:
	python3 dev.py test
bench:
	python3 dev.py bench
lint:
	.venv/bin/ruff check .
