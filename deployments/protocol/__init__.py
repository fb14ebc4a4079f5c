"""What every layer passes and raises: a request's options and result, the errors, vector math. Plain Python,
no Ray, no model.
"""
