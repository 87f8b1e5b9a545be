"""The planner: the cost model (``cost.py``), its search over layouts (``search.py``), its validation
against measured and compiled runs, and the command line (``__main__.py``)."""
