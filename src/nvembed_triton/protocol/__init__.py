"""The wire protocol every front and the model agree on, with the standard library and numpy only:
tensor and model names (contract), per-request options (options), input limits (validation), error
reasons and exceptions (reasons, errors), the closed flag and health file (lifecycle). Imports
nothing else of the package."""
