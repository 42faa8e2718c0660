.PHONY: setup setup-runtime demo test bench

setup:
	bash scripts/setup.sh

# what the demo needs, without the test tools
setup-runtime:
	bash scripts/setup.sh runtime

# (1) the main job: a short MoCo pretraining on the embedded glyphs, local Ray, 2 CPU workers, kNN next to both baselines
demo: setup-runtime
	RAY_AUTH_MODE=disabled .venv/bin/python -m moco_ray.train

# (2) the tests
test: setup
	RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q --durations=25 tests

bench: setup
	.venv/bin/python bench/data.py
	.venv/bin/python bench/step.py
