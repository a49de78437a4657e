"""Reads FedREX run outputs (parquet) into pandas: tables, plots, reports."""
