"""Cloud adapters: S3 transfer, SageMaker jobs and deployment behind small functions. Imports the core."""
