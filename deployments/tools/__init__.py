"""Processes and commands around the service: ``serve_local`` (one machine, ``make serve``) and
``compile_cache`` (OpenVINO models compiled ahead).
"""
