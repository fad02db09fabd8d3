"""``python -m ratelimit_svc`` runs the service, like the ``ratelimit`` console script."""

from .app import main

main()
