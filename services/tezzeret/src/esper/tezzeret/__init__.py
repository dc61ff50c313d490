"""Tezzeret: compiles Karn blueprints into Urza artifacts (instantiate, validate, warm up, digest, register)."""

from esper.tezzeret.compiler import CompileError, CompileResult, compile_blueprint, compile_with_retries

__all__ = ["CompileError", "CompileResult", "compile_blueprint", "compile_with_retries"]
