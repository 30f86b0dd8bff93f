"""slipway: deployment automation for a Node.js app run by PM2 on PostgreSQL (controller side)."""

__version__ = "0.1.0"
