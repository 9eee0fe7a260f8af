"""The encoding loop under both ways of embedding items (embed.py in memory, catalogue.py to parts):
images of item-table rows -> an ImageEncoder in eval mode -> float32 vectors, one batch at a
time, the next batch decoded in a background thread while the current one is encoded.
"""
import numpy as np
import torch


def resolve_device(device):
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; any other value as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def encoded_batches(encoder, items, rows=None, image_size=None, batch_size=256, device="cpu", decoder="auto",
                    progress=False):
    """Yield (item_ids (b,) int64, vectors (b, d) float32 numpy, not normalised) for the item
    table's rows `rows` (positions; default all, in table order), `batch_size` at a time, with
    `encoder` (an ImageEncoder) in eval mode and no grad. Images are read lazily (bytes or files,
    see data/images.py), decoded at `image_size` (None: as stored) on `device`."""
    from concurrent.futures import ThreadPoolExecutor

    from courier_fast.data.decode import ImageDecoder
    from courier_fast.data.images import ItemImages

    dec = ImageDecoder(backend=decoder, device=device, size=image_size)
    images = ItemImages(items)
    ids = items.column("item_id").to_numpy()
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="embed", unit="item", dynamic_ncols=True)

    def load(chunk):
        return dec(images.read(chunk), item_ids=ids[chunk])

    was_training = encoder.training
    encoder.eval()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="courier-fast-decode") as pool:
            nxt = pool.submit(load, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                x = nxt.result().to(device)
                nxt = pool.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
                with torch.no_grad():  # not around the yield: the caller's grad mode is its own
                    vectors = encoder(x).float().cpu().numpy()
                yield ids[chunk], vectors
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        encoder.train(was_training)
        images.close()
        if bar is not None:
            bar.close()
