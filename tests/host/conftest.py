import pytest

import hostenv


@pytest.fixture(scope="session")
def pack():
    """This pack, imported as ComfyUI imports a custom node package (host on sys.path first)."""
    return hostenv.import_pack()
