import pytest


@pytest.fixture(autouse=True)
def _fresh_wandb_per_test():
    """wandb keeps its settings (WANDB_DIR included) in a process-wide singleton; reset it after each test so the
    next test's run lands in that test's own temporary folder."""
    yield
    import wandb

    wandb.teardown()
