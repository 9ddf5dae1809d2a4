"""Build script: packages fastpeft (with the Triton kernels of kernels/ as fastpeft.kernels) and,
where nvcc is found, the CUDA C++ extension fastpeft._C (see csrc/)."""

from setuptools import find_packages, setup

packages = find_packages(include=["fastpeft", "fastpeft.*"]) + ["fastpeft.kernels"]

setup(
    packages=packages,
    package_dir={"fastpeft.kernels": "kernels"},
)
