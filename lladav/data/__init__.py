"""Data: corpus readers, the chat template, image checks, the mixture build and the training loader."""


class RecordError(ValueError):
    """A record that cannot be trained on; `code` is its reject reason, `detail` the explanation.

    Readers, image checks and the template raise subclasses; the build turns any of them into a
    rejects.parquet row.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail
