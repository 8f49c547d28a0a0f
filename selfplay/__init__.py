"""selfplay: iterative self-play preference-data generation and alignment (MAP selection, DPO/SimPO with TRL)."""

__version__ = "0.1.0"
