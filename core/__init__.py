"""The bottom layer: settings, domain errors, principals and permissions, the backend protocols and
the shared types. Every other package may import it; it imports none of them."""
