"""fednnunet: federated nnU-Net training over RabbitMQ/Celery, S3 and Redis."""

__version__ = "0.1.0"
