"""Thin Typer commands, one per DVC stage; each parses options and calls netvlad_core."""
