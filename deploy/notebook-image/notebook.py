import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo
    return (mo,)


@app.cell
def _():
    # SPARK_REMOTE (set by Marina) points at this notebook's own Sail server.
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    return (spark,)


if __name__ == "__main__":
    app.run()
