import pytest


@pytest.fixture(scope="session")
def tiny():
    """Cache of tiny random pipelines by kind ("sd1", "sd2v", "sdxl")."""
    from diffusion_xai.testing import tiny_pipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tiny_pipeline(kind)
        return cache[kind]
    return get
