from setuptools import setup

setup(
    name="threadpool_proxy",
    version="0.1.0",
    description="A PostgreSQL connection pooler / wire proxy in pure Python, using threads",
    packages=["threadpool_proxy"],
    python_requires=">=3.10",
    install_requires=["scramp>=1.4", "pyyaml>=6", "prometheus_client>=0.17"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "psycopg[binary]>=3.1", "trustme>=1.0",
                 "hypothesis>=6", "asyncpg>=0.27", "psycopg2-binary>=2.9"],
    },
    entry_points={
        "console_scripts": ["threadpool-proxy = threadpool_proxy.__main__:main"],
    },
)
