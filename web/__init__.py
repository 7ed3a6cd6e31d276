"""The HTTP application: Connexion and the fast lane over the handlers, the transport, middlewares,
error bodies and Server-Sent Events."""
