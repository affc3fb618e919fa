"""Packages: `llm_platform`, and the Hydra config tree `conf/` shipped inside it as `llm_platform.conf`.

The repository keeps `conf/` at its top (where users look for it); pyproject.toml's package data lists its files.
Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llm_platform*"]), "llm_platform.conf"],
    package_dir={"llm_platform.conf": "conf"},
)
