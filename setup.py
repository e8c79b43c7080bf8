"""Package discovery (the rest of the metadata is in pyproject.toml).

Everything ships under qwenvl/: the oracle (qwenvl/reference, also reachable as the top-level reference/ link
of the checkout) and the tiny models and demo data (qwenvl/fixtures, likewise fixtures/). Each import path is
where its files live, so a plain checkout with PYTHONPATH=. imports everything, and an editable install is a
plain path entry (setuptools' static .pth): a namespace folder named qwenvl elsewhere on sys.path (an upstream
fine-tuning checkout) never outranks this package. Every package under qwenvl/ is found by discovery: a new
subpackage cannot be left out of the wheel.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["qwenvl", "qwenvl.*"]), package_dir={"": "."})
