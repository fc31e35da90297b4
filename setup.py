# All metadata lives in pyproject.toml; this file only lets legacy tools
# (`python setup.py develop`, old pip) find the project.
from setuptools import setup

setup()
