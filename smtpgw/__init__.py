"""smtpgw: an authenticated SMTP relay gateway with a durable priority queue."""

__version__ = "0.1.0"
