"""The canonical harmonized schema and every data contract written against it."""
