"""Packaging for smtpgw: flat layout, twistd plugin under twisted/plugins."""

from setuptools import setup

setup(
    name="smtpgw",
    version="0.1.0",
    description="An authenticated SMTP relay gateway with a durable priority queue",
    python_requires=">=3.11",
    packages=["smtpgw", "web", "twisted.plugins"],
    package_data={
        "twisted": ["plugins/smtpgw_plugin.py"],
        "web": ["templates/*.xml", "static/*", "openapi.json"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl",
        "service-identity",
        "cryptography",
        "idna",
        "klein",
        "bcrypt",
        "attrs",
        "automat",
        "zope.interface",
        "prometheus-client",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-twisted",
            "pytest-timeout",
            "pytest-xdist",
            "hypothesis",
            "treq",
            "coverage",
            "ruff",
            "mypy<2.5",
            "mypy-zope",
            "selenium",
            "schemathesis",
        ],
    },
    entry_points={
        "console_scripts": ["smtpgw-admin = smtpgw.admin_cli:main"],
    },
)
