"""Pure, mergeable statistics: profiles, drift and label metrics, their tests.

No I/O, clock or logging: numbers in, numbers out, so monitor and retrain both use them
(the layering test holds every module here to that).
"""
