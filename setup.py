"""Package discovery (the rest of the metadata is in pyproject.toml).

reference/ and fixtures/ live at the top of the checkout (the design card) but ship inside the package as
qwenvl.reference and qwenvl.fixtures, so an installed qwenvl can verify itself and no generic top-level
name ("reference", "fixtures") is squatted in site-packages. Every package under the three roots is found
by discovery: a new subpackage cannot be left out of the wheel.
"""

from setuptools import find_packages, setup

ROOTS = {"qwenvl": "qwenvl", "qwenvl.reference": "reference", "qwenvl.fixtures": "fixtures"}

packages = []
for name, path in ROOTS.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(path))]

setup(packages=packages, package_dir=ROOTS)
