"""``megarlhf study``: the seed papers' findings as runnable, resumable studies with plots.

A study file (:mod:`.spec`) is a base job plus a sweep; :mod:`.sweep` expands it into job
instances and validates every one before anything runs; :mod:`.runner` launches them (one at a
time locally, or as Ray jobs) and skips complete ones; :mod:`.aggregate` reads their metrics;
:mod:`.findings` holds the nine analyses (statistic, verdict, plot) over :mod:`.stats`;
:mod:`.report` and :mod:`.plot` write the results. Shipped studies: ``examples/studies/``.
"""
