"""monomail: a monolithic asyncio mail server (SMTP in, routing, delivery, a durable spool)."""
