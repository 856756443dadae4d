"""Stateful detectors: the CUSUM family and the post-promotion watch and canary.

Pure like monitor.stats: their state is explicit (state_dict / load_state_dict) so that a
restarted daemon resumes them from the state store.
"""
