"""What every runtime agrees on, with the standard library and numpy only: the wire contract
(contract), request rules and their limits (request_rules, validation), the error taxonomy
(reasons, errors), the cancel board and closed flag the two models and the launcher share
(lifecycle), and every setting, declared once (settings). Imports nothing else of the package."""
