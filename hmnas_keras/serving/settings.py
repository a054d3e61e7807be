"""The HTTP server's limits and timeouts, one place for their defaults (the CLI's flags read
them; importing this needs nothing of the `http` extra)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What one request may ask, and how long and how many connections the server waits on.

    `max_request_pixels` default (None): 4 images of the classifier's
    `max_image_pixels`.
    """

    max_images: int = 64
    max_request_bytes: int = 16 * 1024 * 1024
    max_request_pixels: int | None = None
    batch_size: int = 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 2048
