"""Celery wiring of the site and coordinator workers (tasks that only call the services)."""
