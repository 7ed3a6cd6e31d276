"""The HTTP service: Connexion app, 3.1 bridge, auth, errors, settings, command line, embedded stack."""
