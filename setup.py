"""Plain setuptools shim.

``pip install .`` compiles nothing: every path of xloss (Triton kernels, the chunked CPU path, the references)
is Python.  The metadata lives in pyproject.toml; this file exists so that tools which still call
``setup.py`` directly work, and so that a later compiled-ops build can hook in here.
"""

from setuptools import setup

setup()
