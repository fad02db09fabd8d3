"""``python -m ratelimit_svc`` runs the service, like the ``ratelimit`` console script."""

from ratelimit_svc.main import main

main()
